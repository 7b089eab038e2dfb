"""The push protocol core shared by the client and the dataplane.

Sans-I/O: nothing here opens a socket or a file or reads a clock. Time is always
an argument (`now`, seconds on the caller's clock), so every behaviour is a pure
function of its inputs and is tested without a network.

Modules, one concern each:
  constants  every number with protocol meaning, with its reason
  drops      the drop reasons (shared with the dataplane's metrics) and errors
  codec      push packet header parse/build, seal/open with an AEAD: the
             packet cipher, compiled (_codec.c) or its pure-Python reference
  aead       cipher suites and the counter nonce
  replay     the RFC 6479 sliding replay window
  keys       one generation of keys with its send counter and limits
  lifecycle  the session state machine (a transition table)
  session    a tunnel session: previous/current/next keys, seal/open, timers
"""
