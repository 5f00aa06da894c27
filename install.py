"""MagicFusion needs nothing beyond what the WebUI installs (torch, gradio, numpy, k-diffusion)."""
