"""Running an experiment: the Ray Tune driver, the code that runs in a trial, the torchrun launcher."""
