"""The NAT lab: real kernel NAT in network namespaces, the real programs inside (issue 9)."""
