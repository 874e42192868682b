"""pnsfw: index images into a searchable, NSFW-scored CLIP embedding store."""

__version__ = "0.1.0"
