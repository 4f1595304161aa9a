"""Bridges to other tools, used to compare lowbit against them and to check its files with them."""
