"""TF-IDF (word 1-2 grams) + LinearSVC on an adapter's own train/test split.

Usage: python scripts/svc_baseline.py ADAPTER_FOLDER [N_TEST]
Prints the held-out accuracy on the first N_TEST test rows (default: 1000, like
`bot train`), so it compares with the adapter's metrics.json on the same examples.
"""

import sys

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.svm import LinearSVC

from bot.manifests.spec import AdapterSpec
from bot.training.train import training_rows

spec, splits = training_rows(AdapterSpec.from_dir(sys.argv[1]))
test = splits.test[: int(sys.argv[2]) if len(sys.argv) > 2 else 1000]
vec = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2))
clf = LinearSVC(random_state=0).fit(vec.fit_transform([r["text"] for r in splits.train]),
                                    [r["label"] for r in splits.train])
pred = clf.predict(vec.transform([r["text"] for r in test]))
accuracy = sum(p == r["label"] for p, r in zip(pred, test)) / len(test)
print(f"{spec.name}: TF-IDF + LinearSVC {accuracy:.1%} on {len(test)} test rows "
      f"(trained on {len(splits.train)}; {len(spec.labels)} labels)")
