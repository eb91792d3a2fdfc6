"""Classification metrics printed exactly as Dassl's evaluator prints them (CoOp's parsers read
the `* accuracy: X%` line)."""
import torch


class Classification:
    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.reset()

    def reset(self):
        self.predictions = []
        self.labels = []

    def process(self, logits: torch.Tensor, labels: torch.Tensor):
        self.predictions.append(logits.argmax(dim=1).cpu())
        self.labels.append(labels.cpu())

    def evaluate(self) -> dict:
        pred = torch.cat(self.predictions) if self.predictions else torch.zeros(0, dtype=torch.long)
        gt = torch.cat(self.labels) if self.labels else torch.zeros(0, dtype=torch.long)
        total = gt.numel()
        correct = int((pred == gt).sum())
        accuracy = 100.0 * correct / max(total, 1)
        results = {"accuracy": accuracy, "error": 100.0 - accuracy,
                   "macro_f1": 100.0 * macro_f1(pred, gt, self.num_classes)}
        print("=> result\n"
              f"* total: {total:,}\n"
              f"* correct: {correct:,}\n"
              f"* accuracy: {accuracy:.1f}%\n"
              f"* error: {results['error']:.1f}%\n"
              f"* macro_f1: {results['macro_f1']:.1f}%")
        return results


def macro_f1(pred: torch.Tensor, gt: torch.Tensor, num_classes: int) -> float:
    """Mean F1 over the classes that occur in the labels or the predictions (as sklearn does)."""
    present = torch.unique(torch.cat([pred, gt]))
    if present.numel() == 0:
        return 0.0
    confusion = torch.bincount(gt * num_classes + pred, minlength=num_classes ** 2)
    confusion = confusion.reshape(num_classes, num_classes).double()[present][:, present]
    tp = confusion.diag()
    precision = tp / confusion.sum(0).clamp(min=1)
    recall = tp / confusion.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return float(f1.mean())
