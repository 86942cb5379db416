import { Dsocr, DsocrError } from 'dsocr';
window.dsocrApp = { Dsocr, DsocrError };
