"""Labelled image datasets (ImageFolder trees and .npz arrays) as uint8 NHWC arrays."""
