"""relayq.cli"""
