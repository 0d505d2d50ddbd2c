"""matcher: face matching for border e-gates (1:1 verify, 1:N identify) over gRPC."""

__version__ = "0.1.0"
