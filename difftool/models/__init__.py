"""Models: build, the one loading door (importers included), export, conversion, description."""
