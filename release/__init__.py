"""Building the client executable: the PyInstaller entry point and spec, the WinTun
DLL fetch and check, the Windows wheels check. Run as scripts by the Makefile and
the Windows workflow; imported by the tests as `release.<module>`."""
