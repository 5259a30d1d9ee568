"""Limits on the images the segmentation commands accept (defaults of their flags; no torch import, so that the
command line's help stays fast)."""

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")  # what folders are searched for
MAX_PIXELS = 100_000_000  # an image larger than this is refused unread (a decompression bomb is a few KB on disk)
MAX_BYTES = 256 * 2**20  # a file larger than this is refused unread
# larger images are segmented downscaled (memory stays bounded), their labels upscaled back: the protocol itself
# resizes every image to a short side of 448 and a long side of at most 2048 (under 1 Mpx)
WORK_PIXELS = 4_000_000
