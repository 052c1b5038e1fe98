from setuptools import setup; setup()  # metadata lives in setup.cfg
