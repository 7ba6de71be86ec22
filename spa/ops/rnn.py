"""placeholder"""
RULES: dict = {}
MACS: dict = {}
REWRITES: dict = {}
