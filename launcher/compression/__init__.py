"""Model compression in the same job spec: gradual pruning, distillation, post-training int8 quantization."""
