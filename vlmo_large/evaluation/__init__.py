"""Held-out evaluation: retrieval recall, the stage-3 pretraining metrics, and example figures."""
from vlmo_large.evaluation.pretraining import encode_for_retrieval, evaluate_pretraining
from vlmo_large.evaluation.retrieval import chance_r_at_1, retrieval_metrics

__all__ = ["chance_r_at_1", "encode_for_retrieval", "evaluate_pretraining", "retrieval_metrics",
           "retrieval_examples_figure"]


def __getattr__(name):
    # matplotlib is imported only by code that draws figures.
    if name == "retrieval_examples_figure":
        from vlmo_large.evaluation.figures import retrieval_examples_figure
        return retrieval_examples_figure
    raise AttributeError(name)
