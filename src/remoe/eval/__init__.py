"""Downstream evaluation through lm-eval: the `remoe` model adapter and the offline local task suite."""
