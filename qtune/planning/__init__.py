"""Before you spend: the weights' memory per precision from config.json alone (memory), and the predicted peak memory
of a training run, whether it fits a GPU, and the longest context that does (plan)."""
