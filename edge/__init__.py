"""edge-infer: the device runtime. Nothing heavy (torch, cv2, matplotlib) is imported here."""

__version__ = "0.1.0"
