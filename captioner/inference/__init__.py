"""From features to captions and beyond: decoding (greedy, sampling, beam search), explanations,
the encoder's inference engines and ONNX export, and a captioner that runs without PyTorch."""
