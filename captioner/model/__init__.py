"""The network: CNN encoders (EfficientNet-Lite, torchvision) and the LSTM decoder fed through W_ih,
its checkpoints on disk and on the Hugging Face Hub, and the mixed precision it computes in."""
