#!/usr/bin/env bash
# Lay out WordNet 3.0 where NLTK looks for it, without nltk.download (no network here).
# Debian's wordnet-base + wordnet-sense-index hold the WordNet 3.0 database; NLTK also wants
# a `lexnames` file, which Debian does not ship, so we write the standard 45 lexicographer
# file names ourselves. Online users can simply run: python -c "import nltk; nltk.download('wordnet')".
# Usage: scripts/setup_wordnet.sh [NLTK_DATA_DIR]   (default: ./nltk_data)
set -euo pipefail
dest="${1:-nltk_data}/corpora/wordnet"
if [ -f "$dest/lexnames" ] && [ -f "$dest/data.noun" ]; then exit 0; fi
if [ ! -f /usr/share/wordnet/data.noun ] || [ ! -f /usr/share/wordnet/index.sense ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq wordnet-base wordnet-sense-index) >/dev/null
  else
    echo "WordNet 3.0 missing: install Debian's wordnet-base and wordnet-sense-index (or run nltk.download('wordnet'))" >&2
    exit 1
  fi
fi
mkdir -p "$dest"
find /usr/share/wordnet -maxdepth 1 -type f -exec cp {} "$dest/" \;
i=0
for name in adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute \
  noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group \
  noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession \
  noun.process noun.quantity noun.relation noun.shape noun.state noun.substance noun.time \
  verb.body verb.change verb.cognition verb.communication verb.competition verb.consumption \
  verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession \
  verb.social verb.stative verb.weather adj.ppl; do
  case "$name" in adj.*) pos=3 ;; adv.*) pos=4 ;; noun.*) pos=1 ;; verb.*) pos=2 ;; esac
  [ "$name" = adj.ppl ] && pos=3
  printf '%02d\t%s\t%s\n' "$i" "$name" "$pos"
  i=$((i + 1))
done > "$dest/lexnames"
echo "WordNet 3.0 installed for NLTK in $dest"
