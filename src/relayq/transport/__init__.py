"""relayq.transport"""
