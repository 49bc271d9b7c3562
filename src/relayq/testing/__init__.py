"""relayq.testing"""
