"""The CRI streaming server: Exec, Attach and PortForward over SPDY/3.1 and WebSocket.

A layer of its own between the API (whose RPCs hand out the URLs) and the service layer
(whose `StreamBackends` do the VM's side): see service/stream_io.py.
"""
