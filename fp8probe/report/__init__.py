"""Report layer: renders results JSON into one self-contained HTML file and compares two results (never imports analysis)."""
