"""Weight formats: this project's plain layout, the reference VLMo layout, timm/BEiT vision weights."""
