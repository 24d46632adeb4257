"""Segmentation models: the U-Net (segmentation_models_pytorch) and its inference helper."""
