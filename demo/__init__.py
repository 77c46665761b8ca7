"""``unitok demo``: an application on top of training and evaluation that trains the whole system in the shapes
world on a CPU and scores it (``pipeline``), with the per-position probes of its ablation (``probe``)."""
