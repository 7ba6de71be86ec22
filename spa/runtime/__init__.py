"""Running the model: the probe and constant folding (``probing``), dynamic dims as symbols and the
sizes a model runs at (``shapes``), calibration data and activation statistics (``calib``), and the
inputs spa feeds a model without data (``synthetic``)."""
