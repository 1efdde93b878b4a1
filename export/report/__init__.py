"""Per-format report: size, speed, parity and clinical figures on the same test images."""
