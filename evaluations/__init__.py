"""Sample-quality evaluation (ADM evaluator metrics) and dataset npz builders."""
