"""Inpainting: RePaint, masks, and the inpainting job."""
