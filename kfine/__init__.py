"""kfine: fine-tune pretrained Keras CNNs on small image datasets from one config file.

Importing kfine imports nothing heavy: TensorFlow and Keras load only in the modules that need them.
"""
__version__ = "0.1.0"
