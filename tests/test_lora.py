"""LoRA through peft: adapters on the backbone projections (not the depth head's same-named layers), code embedder and
depth head trained fully, quantiser frozen; train -> save adapter -> `unitok merge-lora` -> the merged plain model
gives the adapter model's outputs."""
from __future__ import annotations

import torch
from peft import PeftModel
from transformers import AutoTokenizer

from mllm import UniTokMLLM, UniTokMLLMConfig
from mllm_train_helpers import make_data, run_cli, write_recipe
from train.mllm.config import MLLMTrainConfig
from train.mllm.trainer import apply_lora


def test_lora_targets_only_the_backbone(tmp_path):
    cfg = MLLMTrainConfig.load(None, ["model.preset=tiny", "model.text_tokenizer=x", "lora.enabled=true"])
    model = apply_lora(UniTokMLLM(UniTokMLLMConfig.from_preset("tiny", depth_layers=1)), cfg)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    lora = [n for n in names if "lora_" in n]
    assert lora and all(".model.layers." in n and "depth_head" not in n for n in lora)
    assert len(lora) == 2 * 7 * model.base_model.model.config.num_hidden_layers  # A and B on 7 projections
    assert any("depth_head" in n and "modules_to_save" in n for n in names)
    assert any("code_embedder" in n and "attn_projection" in n for n in names)
    assert not any("quantizer" in n for n in names)
    assert not any(n.endswith("embed_tokens.weight") or "lm_head" in n for n in names)


def test_lora_train_merge_gives_the_adapter_outputs(tmp_path):
    files = make_data(tmp_path / "data")
    text_tok = AutoTokenizer.from_pretrained(files["text_tokenizer"])
    base_dir = tmp_path / "base"
    torch.manual_seed(0)
    base = UniTokMLLM(UniTokMLLMConfig.from_preset("tiny", vocab_size=len(text_tok), num_hidden_layers=2,
                                                   depth_layers=1))
    base.save_pretrained(base_dir)
    text_tok.save_pretrained(base_dir)
    recipe = write_recipe(tmp_path, files, tmp_path / "lora", train={"steps": 6},
                          model={"preset": None, "pretrained": str(base_dir), "overrides": {}},
                          lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}, optim={"lr": 1e-2})
    run_cli("train", "--config", str(recipe))
    adapter = tmp_path / "lora" / "final" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    run_cli("merge-lora", str(adapter), "--base", str(base_dir), "--out", str(tmp_path / "merged"))

    with_adapter = PeftModel.from_pretrained(UniTokMLLM.from_pretrained(base_dir), str(adapter)).eval()
    merged = UniTokMLLM.from_pretrained(tmp_path / "merged").eval()
    exported = UniTokMLLM.from_pretrained(tmp_path / "lora" / "final").eval()  # the trainer's merged export
    plain = UniTokMLLM.from_pretrained(base_dir).eval()
    cfg = merged.config
    g = torch.Generator().manual_seed(0)
    N = cfg.image_positions
    ids = torch.tensor([[1, 40, 41, 42, 3] + [-200] * N + [4, 2]])
    labels = torch.tensor([[-100] * 4 + [3] + [-200] * N + [4, 2]])
    codes = torch.randint(0, cfg.codebook_size, (1, cfg.num_codebooks, N), generator=g)
    outs = [m(input_ids=ids, labels=labels, image_codes=codes) for m in (with_adapter, merged, exported, plain)]
    for o in outs[1:3]:
        assert torch.allclose(o.loss, outs[0].loss, atol=1e-5)
        assert torch.allclose(o.logits, outs[0].logits, atol=1e-4)
        assert torch.allclose(o.image_logits, outs[0].image_logits, atol=1e-4)
    assert abs(outs[3].loss.item() - outs[0].loss.item()) > 1e-3  # training changed the model
    assert not torch.equal(merged.depth_head.linear_head.weight, plain.depth_head.linear_head.weight)
    assert torch.equal(merged.model.embed_tokens.weight, plain.model.embed_tokens.weight)  # not trained
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()


def test_merge_refuses_a_state_with_a_renamed_or_missing_base_key():
    """A base tensor missing from the state (e.g. renamed by a peft release) must fail, not export random weights."""
    import pytest

    from train.mllm.trainer import merge_lora_state

    cfg = MLLMTrainConfig.load(None, ["model.preset=tiny", "model.text_tokenizer=x", "lora.enabled=true"])
    torch.manual_seed(0)
    model = apply_lora(UniTokMLLM(UniTokMLLMConfig.from_preset("tiny", depth_layers=1)), cfg)
    state = model.state_dict()
    merged = merge_lora_state(model.base_model.model.config, state, cfg)  # the complete state merges
    key = next(k for k in state if k.endswith("layers.0.self_attn.q_proj.base_layer.weight"))
    assert torch.equal(merged.model.layers[0].self_attn.q_proj.weight, state[key])  # lora_B starts at zero
    renamed = {(k.replace("base_layer", "base") if k == key else k): v for k, v in state.items()}
    with pytest.raises(ValueError, match=r"1 missing \[.*q_proj\.base_layer\.weight.*1 unexpected"):
        merge_lora_state(model.base_model.model.config, renamed, cfg)
    dropped = {k: v for k, v in state.items() if k != key}  # the earlier merge let a missing base key through
    with pytest.raises(ValueError, match=r"1 missing \[.*q_proj\.base_layer\.weight.*0 unexpected"):
        merge_lora_state(model.base_model.model.config, dropped, cfg)
