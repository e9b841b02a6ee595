"""Experiment tracking with MLflow, on rank 0 only; see tracker.py for use and mlflow_tracker.py for
what happens when the tracking server goes away."""
from vlmo_large.tracking.params import flatten_params, git_commit, run_setup
from vlmo_large.tracking.factory import create_tracker
from vlmo_large.tracking.tracker import Tracker

__all__ = ["Tracker", "create_tracker", "flatten_params", "git_commit", "run_setup"]
