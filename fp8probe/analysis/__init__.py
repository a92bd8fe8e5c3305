"""Analysis engine: load a model, capture its linear GEMMs, replay FP8/INT8 recipes, measure, save results (see pipeline.analyze)."""
