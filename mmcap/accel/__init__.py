"""Inference speed: the plan that one `precision` resolves to (`plan`), and every fast path it can
choose (BatchNorm folding, int8 linears and encoder, ONNX Runtime, the C++ attention kernels, malloc
tuning), each chosen by timing it once per machine (`timing`). Nothing below this layer imports it."""
