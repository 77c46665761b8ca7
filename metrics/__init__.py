"""What training and evaluation both measure with: the metric networks (``lpips``: LPIPS-VGG, a training loss and a
tokenizer metric; ``inception``: torch-fidelity's FID Inception) and GenEval's rules for any detector
(``geneval``)."""
