"""placeholder"""
track = None
