"""The training machinery under main.py: the epoch loop and inference (engine), what the options
choose (recipe), the checkpoint (checkpoint), how a run reports (report) and Grad-CAM (explain)."""
