"""relayq.smtp"""
