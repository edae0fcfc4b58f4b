"""Labelled image sets (MedMNIST .npz, class folders, station crops) and INT8 calibration samples/readers."""
