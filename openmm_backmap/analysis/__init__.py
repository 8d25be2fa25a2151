"""Analysis: reconstruction metrics, importance reweighting, basins, plots and evaluation reports."""
