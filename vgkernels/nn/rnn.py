"""placeholder"""
LSTM = GRU = RNN = None
