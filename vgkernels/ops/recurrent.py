"""placeholder"""
recurrent = None
