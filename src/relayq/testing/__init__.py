"""Test helpers shared by the test suite and `make demo`.

`smarthost` (recording aiosmtpd server, raw scripted server), `tls` (trustme
certificates), `dns` (a loopback DNS responder). Import the submodules
directly; this package imports nothing heavy itself.
"""
