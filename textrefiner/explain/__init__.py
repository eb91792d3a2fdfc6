"""`textrefiner-explain` and `explain_images`: what a trained run's TextRefiner learned.

    textrefiner-explain --model-dir output/run                  # the run's test split
    textrefiner-explain --model-dir output/run photos/ --output-dir report/

    from textrefiner.explain import explain_images, draw_image_explanation
    predictor = Predictor.from_run("output/run")
    explanation = explain_images(predictor, ["a.jpg", "b.jpg"])   # tensors, one pass
    png = draw_image_explanation(explanation, 0)                  # PNG bytes of image 0

`numbers.py` computes (one pass, each image encoded once: the evaluator's logits with the
refiner on and off, CLS attention, semantic patches, cache entries, read weights), `report.py`
draws (pictures, the report folder), `cli.py` is the command.
"""
from .numbers import (Explanation, attribute_purity, class_entry_match, explain_image,
                      explain_images, refiner_off, similar_order)
from .report import ImageFigure, draw_image_explanation, explain_image_figure, write_report

__all__ = ["Explanation", "ImageFigure", "explain_images", "explain_image",
           "explain_image_figure", "draw_image_explanation", "write_report", "refiner_off",
           "attribute_purity", "class_entry_match", "similar_order"]

