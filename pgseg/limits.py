"""Limits on the images the segmentation commands accept (defaults of their flags; no torch import, so that the
command line's help stays fast)."""

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")  # what folders are searched for
MAX_PIXELS = 100_000_000  # an image larger than this is refused unread (a decompression bomb is a few KB on disk)
MAX_BYTES = 256 * 2**20  # a file larger than this is refused unread
WORK_PIXELS = 16_000_000  # larger images are segmented downscaled (memory stays bounded); labels upscaled back
