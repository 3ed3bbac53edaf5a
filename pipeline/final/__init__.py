"""The final stage's parts: evaluation maths, pose metrics, plots, the report and the composed encoder."""
