"""DCM: `python train_dcm.py model=<m> circuit=<c> group=<g> desideratum=<object|label|position>` (= `etk-train-dcm`)."""

from etk.cli import train_dcm

if __name__ == "__main__":
    train_dcm()
