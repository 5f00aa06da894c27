"""MagicFusion (Zhao et al., ICCV 2023): fuse two diffusion models per pixel by saliency.

`snb` and `fusion` are pure torch; `params` is pure Python; `webui` adapts them to the
AUTOMATIC1111 WebUI and is the only part that imports the WebUI's `modules`.
"""

__version__ = "0.2.0"
