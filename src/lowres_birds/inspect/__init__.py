"""Looking at data and results: eda, report (+ Grad-CAM), study, evaluate, their figures (plots) and pages (html)."""
